"""The ``jras`` command line.

Subcommands: ``data synth``, ``train``, ``eval``, ``predict``, ``bank build``, ``site init``, ``site adapt``, ``demo`` (a simulated
federation), ``pki ca`` / ``pki server-cert`` / ``pki node-key`` (deployment keys), ``deploy proxy-config``
(the coordinator's public proxy), ``deploy systemd coordinator`` / ``deploy systemd site`` (service units), ``bench cost``
(cost benchmark), ``bench rounds`` (round time through Flower), ``bench shift`` (vendor-shift
benchmark), ``bench real`` (an ACDC federation evaluated in distribution and on unseen sites), ``bench ef``
(ejection fraction from predicted masks against the ground truth).
Run ``jras <command> --help`` for the options of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from jras_core.config import ConfigError, JRASConfig, parse_overrides
from jras_core.files import PROJECT_ROOT
from tools.options import add_device_args, method_sets
from tools.services import PROXY_STATE_DIR, SUPERLINK_LOOPBACK
from tools.sites import demo_sites, synthetic_site

if TYPE_CHECKING:  # heavy imports (torch, MONAI, FAISS) are deferred so that --help is instant
    from jras_core.site import Site, SiteConfig

log = logging.getLogger("jras")



# --------------------------------------------------------------------------- helpers


def load_method(path: str | None, overrides: Sequence[str]) -> JRASConfig:
    cfg = JRASConfig.from_yaml(path) if path else JRASConfig()
    return cfg.with_overrides(parse_overrides(overrides), source="--set") if overrides else cfg


def checkpoint_model(args: argparse.Namespace):
    """The model and method config of ``--checkpoint`` with the command's overrides, the model
    placed on ``train.device`` (a checkpoint loads on any device)."""
    from jras_core.checkpoint import load_model
    from jras_core.device import place

    model, cfg, _ = load_model(args.checkpoint)
    sets = method_sets(args)
    if sets:
        cfg = cfg.with_overrides(parse_overrides(sets), source="--set")
    place(model, cfg.train.device)
    return model, cfg


def collect_sites(args: argparse.Namespace, cfg: JRASConfig) -> list[Site]:
    """Sites from ``--site`` YAMLs, ``--manifest`` CSVs and ``--synthetic`` vendors."""
    from jras_core.data.sources import DataSourceConfig
    from jras_core.site import Site, SiteConfig, safe_site_name

    configs: list[tuple[SiteConfig, Path | None]] = []
    for path in args.site or []:
        configs.append((SiteConfig.from_yaml(path), Path(path).parent))
    for path in args.manifest or []:
        data = DataSourceConfig(kind="manifest", path=str(Path(path).resolve()), skip_bad=args.skip_bad)
        configs.append((SiteConfig(name=safe_site_name(Path(path).stem), data=data), None))
    for vendor in (args.synthetic.split(",") if args.synthetic else []):
        configs.append((synthetic_site(vendor.strip(), args.cases, args.seed, cfg.preprocess.size), None))
    if not configs:
        raise ConfigError("no data given: use --site SITE.yaml, --manifest CSV or --synthetic A,B,C")
    held = set(args.holdout.split(",")) if getattr(args, "holdout", None) else set()
    sites = []
    for sc, root in configs:
        if sc.name in held or sc.vendor in held:
            sc.support_cases = args.support
        sites.append(Site(sc, cfg, root))
    return sites


def print_table(results: dict[str, dict[str, float]], names: Sequence[str]) -> None:
    if not results:
        return
    cols = ["dice_mean"] + [f"dice_{n.lower()}" for n in names] + ["hd95_mean", "guide_dice", "dice_oracle", "dice_random"]
    present = [c for c in cols if any(c in m for m in results.values())]
    print("site".ljust(16) + "".join(c.rjust(13) for c in present))
    for site, m in results.items():
        print(site.ljust(16) + "".join(f"{m.get(c, float('nan')):13.3f}" for c in present))


def print_not_evaluated(sites: Sequence[Site], results: dict[str, dict[str, float]]) -> None:
    """One line per site missing from ``results``, saying why (e.g. a site of one case)."""
    for site in sites:
        if site.name not in results and site.no_validation is not None:
            print(f"{site.no_validation}; not evaluated")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", action="append", metavar="YAML", help="site config (repeatable)")
    p.add_argument("--manifest", action="append", metavar="CSV", help="manifest CSV of NIfTI pairs, one site each (repeatable)")
    p.add_argument("--synthetic", metavar="VENDORS", help="built-in synthetic vendors, e.g. A,B,C")
    p.add_argument("--cases", type=int, default=12, help="cases per synthetic vendor (default 12)")
    p.add_argument("--seed", type=int, default=0, help="data seed for synthetic vendors (default 0)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable cases with a warning")
    add_method_args(p)


def add_method_args(p: argparse.ArgumentParser, config_help: str = "method config (default: built-in defaults)") -> None:
    p.add_argument("--config", metavar="YAML", help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method config value, e.g. --set train.epochs=5 (repeatable)")
    add_device_args(p)


# --------------------------------------------------------------------------- commands


def cmd_data_synth(args: argparse.Namespace) -> int:
    from jras_core.data.synthetic import write_dataset

    manifest = write_dataset(args.out, args.vendor.split(","), args.cases, args.seed, size=args.size)
    print(f"wrote {manifest}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from jras_core.training.centralised import train_centralised

    cfg = load_method(args.config, method_sets(args))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sites = collect_sites(args, cfg)
    out = Path(args.out)
    _, results = train_centralised(sites, cfg, out, progress=not args.quiet, eval_every=args.eval_every)
    print_table(results, cfg.labels.names)
    print_not_evaluated(sites, results)
    print(f"model, metrics and TensorBoard logs in {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jras_core.training.centralised import evaluate_sites

    model, cfg = checkpoint_model(args)
    sites = collect_sites(args, cfg)
    results = evaluate_sites(model, sites, cfg)
    print_table(results, cfg.labels.names)
    print_not_evaluated(sites, results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from jras_core.measures import missing_structures
    from jras_core.predict import Predictor, collect_inputs, predict_inputs
    from jras_core.site import Site

    inputs = collect_inputs(args.inputs)
    model, cfg = checkpoint_model(args)
    if args.site:
        site = Site.from_yaml(args.site, cfg)
        predictor = Predictor.for_site(model, cfg, site)
    elif cfg.uses_retrieval:
        raise ConfigError(f"{args.checkpoint}: a retrieval method (segmenter.fusion "
                          f"{cfg.segmenter.fusion}) predicts with a site's bank: give the site with --site SITE.yaml")
    else:
        predictor = Predictor(model, cfg, None)
    absent = missing_structures(cfg.labels.names)
    if absent:
        print(f"jras predict: the label set {list(cfg.labels.names)} has no {', '.join(absent)}: "
              "the measures of those structures are left empty", file=sys.stderr)
    out = Path(args.out)
    guides = "with retrieved guides" if predictor.use_guides else "without guides"
    print(f"segmenting {len(inputs)} volume(s) {guides} -> {out}", flush=True)

    def failed(path: Path, problem: str) -> None:
        print(f"jras predict: {'stopped at' if args.on_error == 'stop' else 'skipped'} {path}: {problem}",
              file=sys.stderr, flush=True)

    report = predict_inputs(predictor, inputs, out, on_error=args.on_error, progress=not args.quiet,
                            on_failure=failed)
    if report.done:
        print(f"masks:        {out / 'masks'} ({len(report.done)})")
        print(f"overlays:     {out / 'overlays'}")
        print(f"measurements: {report.measurements} ({len(report.pairs)} ED/ES pair(s))")
    for pair in report.pairs:
        print(f"  {pair.case}: LV EF {pair.lv.ef_pct:.1f}% (EDV {pair.lv.edv_ml:.1f} ml, ESV {pair.lv.esv_ml:.1f} ml; "
              f"phases by {pair.rule})")
    if report.failed:
        print(f"jras predict: {len(report.failed)} input(s) failed: "
              + ", ".join(str(p) for p, _ in report.failed), file=sys.stderr)
        return 2 if report.stopped or not report.done else 1
    return 0


def cmd_bank_build(args: argparse.Namespace) -> int:
    model, cfg = checkpoint_model(args)
    sites = collect_sites(args, cfg)
    for site in sites:
        if args.out:
            out = Path(args.out) / site.name if len(sites) > 1 else Path(args.out)
        else:
            out = None  # the site's bank_dir
        store = site.bank_store(out, key_file=args.key_file)
        bank = site.refresh_bank(model.retr)
        path = bank.save(store.directory, store=store)
        how = "encrypted (AES-256-GCM)" if store.encrypted else "NOT encrypted (no key_file / --key-file / $JRAS_BANK_KEY)"
        print(f"{site.name}: bank of {len(bank)} slices -> {path}  [{how}]")
    return 0


def rekey_site_bank(args: argparse.Namespace, site: Site, key_file: Path | None) -> int:
    """``jras site init --rekey``: re-encrypt the site's existing bank from its old key (the
    site's key_file, else ``$JRAS_BANK_KEY``, or ``--old-key-file``) to the new one
    (``--key-file``, created if missing), atomically; the bank's content is kept."""
    from jras_core.retrieval.crypto import ENV_VAR, generate_key_file, resolve_key
    from jras_core.retrieval.store import BankStore
    from jras_core.site_store import SiteStore

    if args.checkpoint:
        raise ConfigError("jras site init: --rekey re-encrypts the existing bank as it is; embed it with "
                          "--checkpoint in a second run, without --rekey")
    old_source = Path(args.old_key_file) if args.old_key_file else site.key_path
    old_key = resolve_key(old_source)
    if old_key is None:
        raise ConfigError(f"{args.site}: --rekey needs the old key: the site's key_file, --old-key-file FILE "
                          f"or ${ENV_VAR}")
    if key_file is None:
        raise ConfigError(f"{args.site}: --rekey needs the new key: --key-file FILE")
    if not key_file.exists():
        generate_key_file(key_file)
        print(f"{site.name}: key file {key_file} (new, mode 0600; back it up: the bank cannot be read without it)")
    store = BankStore(Path(args.out) if args.out else site.bank_path, key=resolve_key(key_file))
    path = store.rekey(old_key)
    print(f"{site.name}: bank {path} re-encrypted from {old_key.source} to {key_file}")
    if site.store_path is not None:
        done = SiteStore(site.store_path, resolve_key(key_file), site.name).rekey(old_key)
        if done:
            print(f"{site.name}: {len(done)} file(s) of the site's store in {site.store_path} re-encrypted")
    if site.key_path is None or key_file.resolve() != site.key_path.resolve():
        print(f"{site.name}: set key_file: {key_file} in {args.site} (the site reads its bank with that key)")
    return 0


def cmd_site_init(args: argparse.Namespace) -> int:
    """Create the site's key file (if missing) and its encrypted bank of training slices; with
    ``--rekey``, re-encrypt the existing bank with a new key instead."""
    from jras_core.retrieval.crypto import ENV_VAR, BankKeyError, generate_key_file, key_from_env
    from jras_core.retrieval.store import ENCRYPTED_BANK_FILE
    from jras_core.site import Site

    if args.old_key_file and not args.rekey:
        raise ConfigError("jras site init: --old-key-file is for --rekey")
    model = None
    if args.checkpoint:
        model, cfg = checkpoint_model(args)
    else:
        cfg = load_method(args.config, method_sets(args))
    site = Site.from_yaml(args.site, cfg)
    if args.out is None and site.bank_path is None:
        raise ConfigError(f"{args.site}: no bank directory: set bank_dir in the site YAML or pass --out DIR")
    key_file = Path(args.key_file) if args.key_file else site.key_path
    if args.rekey:
        return rekey_site_bank(args, site, key_file)
    if key_file is None and key_from_env() is None:
        raise ConfigError(
            f"{args.site}: no bank key: set key_file in the site YAML, pass --key-file FILE, or set ${ENV_VAR}"
        )
    if key_file is not None:
        existing_bank = Path(args.out or site.bank_path) / ENCRYPTED_BANK_FILE
        if not key_file.exists() and existing_bank.is_file():
            raise BankKeyError(
                f"{existing_bank}: an encrypted bank is here, and a new key {key_file} would not read it; "
                "refusing to replace it. To move the bank to a new key, add --rekey (it decrypts with the old "
                "key first); to rebuild it, delete it first"
            )
        if key_file.exists():
            print(f"{site.name}: key file {key_file} (existing)")
        else:
            generate_key_file(key_file)
            print(f"{site.name}: key file {key_file} (new, mode 0600; back it up: the bank cannot be read without it)")
    else:
        print(f"{site.name}: bank key from ${ENV_VAR}")
    store = site.bank_store(args.out, key_file=key_file)
    store.check_key_matches()  # before the data is read: an existing bank of another key is refused
    bank = site.refresh_bank(model.retr) if model is not None else site.bank
    path = bank.save(store.directory, store=store)
    what = f"embedded with {args.checkpoint}" if model is not None else "not embedded yet (refreshed by training)"
    print(f"{site.name}: encrypted bank of {len(bank)} slices ({len(bank.slices.cases)} cases, {what}) -> {path}")
    return 0


def cmd_site_adapt(args: argparse.Namespace) -> int:
    """Adapt a global model to the site with its annotated cases (AdaBN, fine-tuning with
    early stopping) and write the site model, a checkpoint ``jras eval`` reads."""
    from jras_core.site import Site
    from jras_core.training.finetune import adapt_site, save_adapted

    model, cfg = checkpoint_model(args)
    site = Site.from_yaml(args.site, cfg)
    cases = site.train_set
    what = "support" if site.config.support_cases is not None else "training"
    print(f"{site.name}: adapting {args.checkpoint} with {len(set(cases.case_ids.tolist()))} {what} "
          f"cases ({len(cases)} slices)")
    adapted, record = adapt_site(model, cases, cfg, site.bank if cfg.uses_retrieval else None,
                                 progress=not args.quiet)
    path = save_adapted(args.out or site.adapted_model_path, adapted, cfg, record, site=site.name,
                        start=str(Path(args.checkpoint).resolve()))
    rows = record.rows()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
    print(f"site model -> {path}  (jras eval --checkpoint {path} --site {args.site})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tools.simulate import (
        SimulationError,
        format_site_table,
        gpu_share,
        run_simulation,
        site_table,
    )

    if args.rounds < 1 or args.cases < 4 or args.local_epochs < 1:
        raise ConfigError("jras demo: --rounds and --local-epochs must be >= 1 and --cases >= 4")
    out = Path(args.out).expanduser().resolve()
    size = 64
    sites = demo_sites(out / "sites", args.cases, size)
    run_config = {
        "num-server-rounds": int(args.rounds),
        "strategy": "fedavg",
        "method-config": str(PROJECT_ROOT / "configs" / "demo.yaml"),
        "local-epochs": int(args.local_epochs),
        "image-size": size,
        "client-threads": 1,
    }
    for key in ("device", "precision"):
        if getattr(args, key, None):
            run_config[key] = getattr(args, key)
    gpus = args.gpus_per_site if args.gpus_per_site is not None else gpu_share(len(sites), args.device or "auto")
    print(
        f"J-RAS demo: a simulated federation of {len(sites)} synthetic scanner vendors "
        f"({', '.join(p.stem for p in sites)}; {args.cases} cases each, {size} px), "
        f"FedAvg, {args.rounds} rounds of {args.local_epochs} local epoch(s), through Flower's Simulation Engine.\n"
        f"Run folder: {out}\n",
        flush=True,
    )
    try:
        run_dir = run_simulation(
            PROJECT_ROOT, [str(p) for p in sites], run_config,
            out_dir=out.parent, run_name=out.name, stream=not args.quiet, timeout=args.timeout or None, fresh=True,
            gpus_per_client=gpus,
        )
    except SimulationError as exc:
        print(f"jras demo: the federation failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\njras demo: interrupted; the local SuperLink was stopped", file=sys.stderr)
        return 130
    rows = site_table(run_dir)
    print("\nPer-site validation results of the global model after the last round:")
    print(format_site_table(rows))
    history = [json.loads(x) for x in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    trend = [f"{r['round']}: {r['global']['evaluate']['dice_mean']:.3f}" for r in history
             if isinstance(r.get("global", {}).get("evaluate", {}).get("dice_mean"), (int, float))]
    if trend:
        print("Weighted mean Dice by round  " + "  ".join(trend))
    print(f"\nGlobal checkpoint:  {run_dir / 'checkpoint.pt'}")
    print(f"TensorBoard logs:   {run_dir / 'tensorboard'}   (.venv/bin/tensorboard --logdir {run_dir / 'tensorboard'})")
    print(f"Per-round metrics:  {run_dir / 'tensorboard' / 'metrics.jsonl'}")
    print(f"Flower log:         {run_dir / 'flwr-run.log'}")
    return 0


def cmd_bench_cost(args: argparse.Namespace) -> int:
    from benchmarks.cost import run

    return run(args)


def cmd_bench_rounds(args: argparse.Namespace) -> int:
    from benchmarks.rounds import run

    return run(args)


def cmd_bench_shift(args: argparse.Namespace) -> int:
    from benchmarks.shift import run

    return run(args)


def cmd_bench_real(args: argparse.Namespace) -> int:
    from benchmarks.real import run

    return run(args)


def cmd_bench_ef(args: argparse.Namespace) -> int:
    from benchmarks.ef import run

    return run(args)


def cmd_pki_ca(args: argparse.Namespace) -> int:
    from tools.pki import create_ca

    key, cert = create_ca(args.out, common_name=args.name, days=args.days)
    print(f"CA certificate: {cert}  (give it to every site)")
    print(f"CA private key: {key}  (keep it on the coordinator; mode 0600)")
    return 0


def cmd_pki_server_cert(args: argparse.Namespace) -> int:
    from tools.pki import CA_CERT, CA_KEY, create_server_cert

    missing = [str(Path(args.ca) / f) for f in (CA_KEY, CA_CERT) if not (Path(args.ca) / f).is_file()]
    if missing:
        raise ConfigError(f"pki server-cert: {', '.join(missing)} not found (create the CA with `jras pki ca --out DIR`)")
    hosts = args.host or ["localhost", "127.0.0.1"]
    key, cert = create_server_cert(args.ca, args.out, hosts=hosts, days=args.days)
    print(f"SuperLink certificate: {cert}  (valid for {', '.join(hosts)})")
    print(f"SuperLink private key: {key}  (mode 0600)")
    return 0


def cmd_pki_node_key(args: argparse.Namespace) -> int:
    from tools.pki import create_node_key

    key, pub = create_node_key(args.out, comment=args.comment)
    print(f"SuperNode private key: {key}  (stays at the site; mode 0600)")
    print(f"SuperNode public key:  {pub}  (send it to the coordinator for `flwr supernode register`)")
    return 0


def cmd_deploy_proxy_config(args: argparse.Namespace) -> int:
    from tools.pki import CA_CERT, SERVER_CERT, SERVER_KEY
    from tools.proxy import ProxyConfig, ProxyError, check_nginx_conf, nginx_command, write_nginx_conf

    try:
        cfg = ProxyConfig(listen=args.listen, superlink=args.superlink, ca_cert=Path(args.ca) / CA_CERT,
                          server_cert=Path(args.server) / SERVER_CERT, server_key=Path(args.server) / SERVER_KEY,
                          state_dir=args.state_dir, max_body_mib=args.max_body_mib)
        out = write_nginx_conf(cfg, args.out)
        if not args.no_check:
            check_nginx_conf(out, cfg.state_dir)
        command = " ".join(nginx_command(out, cfg.state_dir))
    except ProxyError as exc:
        raise ConfigError(f"deploy proxy-config: {exc}") from None
    print(f"proxy configuration: {out}  (public {cfg.listen} -> Fleet API only -> SuperLink {cfg.superlink})")
    print(f"run it with: {command}")
    print(f"the SuperLink listens on loopback only: flower-superlink ... --host {cfg.superlink.rpartition(':')[0]} "
          f"--port {cfg.superlink.rpartition(':')[2]}")
    return 0


def cmd_deploy_systemd(args: argparse.Namespace) -> int:
    from tools.pki import CA_CERT, SERVER_CERT, SERVER_KEY
    from tools.proxy import ProxyError, nginx_binary, split_address
    from tools.services import coordinator_units, site_unit, write_units

    bin_dir = Path(args.bin_dir).resolve()
    if not (bin_dir / ("flower-superlink" if args.role == "coordinator" else "flower-supernode")).is_file():
        raise ConfigError(f"deploy systemd: {bin_dir} holds no Flower executables (give --bin-dir, the "
                          "environment's bin folder)")
    try:
        if args.role == "coordinator":
            ca, server = Path(args.ca).resolve(), Path(args.server).resolve()
            units = coordinator_units(bin_dir, ca / CA_CERT, server / SERVER_CERT, server / SERVER_KEY,
                                      proxy_conf=Path(args.proxy_conf).resolve(),
                                      proxy_state_dir=Path(args.proxy_state_dir).resolve(),
                                      nginx=args.nginx or nginx_binary(), superlink=args.superlink,
                                      state_dir=Path(args.state_dir).resolve(), user=args.user)
        else:
            split_address(args.superlink, "--superlink")
            site_yaml = Path(args.site).resolve()
            if not site_yaml.is_file():
                raise ConfigError(f"deploy systemd site: {site_yaml}: site YAML not found")
            units = site_unit(bin_dir, args.superlink, Path(args.ca_cert).resolve(), Path(args.key).resolve(),
                              site_yaml, writable=[Path(p).resolve() for p in args.writable],
                              state_dir=Path(args.state_dir).resolve(), user=args.user, allow_ips=args.allow_ip or ())
    except ProxyError as exc:
        raise ConfigError(f"deploy systemd: {exc}") from None
    for path in write_units(units, args.out):
        print(f"unit: {path}")
    print(f"install: cp {' '.join(units)} /etc/systemd/system/ && systemctl daemon-reload && "
          f"systemctl enable --now {' '.join(units)}")
    return 0


# --------------------------------------------------------------------------- parser


def _add_cost_arguments(p: argparse.ArgumentParser) -> None:
    # benchmarks.cost imports nothing heavy at module level, so --help stays instant
    from benchmarks.cost import add_arguments

    add_arguments(p)


def _add_rounds_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.rounds import add_arguments

    add_arguments(p)


def _add_shift_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.shift import add_arguments

    add_arguments(p)


def _add_real_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.real import add_arguments

    add_arguments(p)


def _add_ef_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.ef import add_arguments

    add_arguments(p)


def add_coordinator_arguments(p: argparse.ArgumentParser) -> None:
    """The coordinator's PKI folders and the SuperLink's loopback address, as ``deploy
    proxy-config`` and ``deploy systemd coordinator`` both take them."""
    p.add_argument("--ca", required=True, metavar="DIR", help="folder with ca.crt (jras pki ca)")
    p.add_argument("--server", required=True, metavar="DIR", help="folder with server.pem and server.key "
                   "(jras pki server-cert; valid for the public names, localhost and 127.0.0.1)")
    p.add_argument("--superlink", default=SUPERLINK_LOOPBACK, metavar="HOST:PORT",
                   help=f"the SuperLink's loopback address, its --host and --port (default {SUPERLINK_LOOPBACK})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jras",
        description="J-RAS Federated: retrieval-augmented segmentation across sites.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic vendor volumes (NIfTI) and a manifest.csv")
    synth.add_argument("--vendor", required=True, help="vendor name(s), comma-separated, e.g. A or A,B,C,D")
    synth.add_argument("--cases", type=int, default=10, help="cases per vendor (default 10)")
    synth.add_argument("--size", type=int, default=128, help="matrix size in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, help="output folder")
    synth.set_defaults(func=cmd_data_synth)

    train = sub.add_parser("train", help="centralised J-RAS training on one or more sites")
    add_data_args(train)
    train.add_argument("--holdout", metavar="NAMES", help="site names or vendors held out (never trained; bank from --support cases)")
    train.add_argument("--support", type=int, default=5, help="support cases of a held-out site (default 5)")
    train.add_argument("--out", default="runs/train", help="output folder (default runs/train)")
    train.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    train.add_argument("--eval-every", type=int, default=0, help="log validation Dice every N epochs")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on sites (Dice, HD95, retrieval diagnostics)")
    add_data_args(ev)
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--holdout", metavar="NAMES")
    ev.add_argument("--support", type=int, default=5)
    ev.add_argument("--out", help="write the metrics as JSON here")
    ev.set_defaults(func=cmd_eval)

    pred = sub.add_parser(
        "predict",
        help="segment NIfTI volumes with a checkpoint; write masks, overlays and cardiac measurements",
        description="Segments each input volume as `jras eval` predicts (the checkpoint's preprocessing, "
        "two-pass retrieval from the site's bank, post-processing) and maps the labels back to the input's own "
        "grid. Writes OUT/masks/<input>_seg.nii.gz (the input's shape, affine and header; labels as the "
        "checkpoint's label set, 1 LV, 2 MYO, 3 RV by default), OUT/overlays/<case>.png (mid-ventricular slice "
        "of each volume) and OUT/measurements.csv (LV and RV blood-pool volume, myocardial volume and mass at "
        "1.05 g/ml per volume; EDV, ESV, stroke volume and ejection fraction of LV and RV per ED/ES pair of a "
        "case). ED and ES come from a manifest's phase column, the file name (<case>_ED, <case>_sa_ES) or "
        "ACDC's Info.cfg (<case>_frameNN); a case of two volumes without them takes the one with the larger LV "
        "as ED; the CSV's phase_rule column says which. Files are written atomically as each volume is done. "
        "Exit status: 0 all done, 1 some inputs skipped, 2 stopped or nothing done.",
    )
    pred.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="NIfTI image (.nii, .nii.gz), folder of them (label maps *_gt, *_seg, *_mask skipped) or "
                      "manifest CSV with an 'image' column (optional 'case', 'phase'; a 'mask' column is ignored)")
    pred.add_argument("--checkpoint", required=True, help="model checkpoint (jras train's model.pt or a federation's)")
    pred.add_argument("--site", metavar="YAML",
                      help="the site whose bank the guides come from (needed by retrieval methods); a site with "
                      "support_cases adapts the model to itself first, as in evaluation")
    pred.add_argument("--out", required=True, metavar="DIR", help="output folder (files of the same names are replaced)")
    pred.add_argument("--on-error", choices=["skip", "stop"], default="skip",
                      help="at a bad or unreadable input: skip it and go on (default) or stop; either way it is named "
                      "and what was written before stays")
    pred.add_argument("--quiet", action="store_true", help="no progress bar")
    pred.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value of the checkpoint, e.g. --set retrieval.test_passes=2 (repeatable)")
    add_device_args(pred)
    pred.set_defaults(func=cmd_predict)

    bank = sub.add_parser("bank", help="retrieval bank utilities").add_subparsers(dest="bank_command", required=True)
    build = bank.add_parser("build", help="embed a site's pairs with a checkpoint's retriever and store the bank")
    add_data_args(build)
    build.add_argument("--checkpoint", required=True)
    build.add_argument("--out", help="bank directory (default: the site YAML's bank_dir)")
    build.add_argument("--key-file", metavar="FILE",
                       help="encrypt with this key file (default: the site's key_file, else $JRAS_BANK_KEY)")
    build.set_defaults(func=cmd_bank_build, holdout=None, support=5)

    site_p = sub.add_parser("site", help="site set-up").add_subparsers(dest="site_command", required=True)
    init = site_p.add_parser(
        "init",
        help="create the site's bank key (mode 0600) if missing and its encrypted bank of training slices",
        description="Creates the key file (key_file in the site YAML, or --key-file) with mode 0600 if it "
        "does not exist, then builds the bank of the site's training slices and stores it encrypted "
        "(AES-256-GCM) in bank_dir (or --out). With --checkpoint, the bank is embedded with its retriever. "
        "An existing bank encrypted with another key is never replaced: --rekey re-encrypts it with the new "
        "key (--key-file), decrypting it with the old one (the site's key_file, or --old-key-file) first. "
        "The key is never printed.",
    )
    init.add_argument("--site", required=True, metavar="YAML", help="site config")
    init.add_argument("--checkpoint", help="embed the bank with this checkpoint's retriever (default: not embedded)")
    init.add_argument("--key-file", metavar="FILE", help="key file (default: the site's key_file, else $JRAS_BANK_KEY)")
    init.add_argument("--out", metavar="DIR", help="bank directory (default: the site's bank_dir)")
    init.add_argument("--rekey", action="store_true",
                      help="re-encrypt the existing bank with --key-file (created if missing), after decrypting it "
                      "with the old key; the bank's content is kept, nothing is rebuilt")
    init.add_argument("--old-key-file", metavar="FILE",
                      help="with --rekey: the bank's current key (default: the site's key_file, else $JRAS_BANK_KEY)")
    add_method_args(init, "method config without --checkpoint (default: built-in defaults)")
    init.set_defaults(func=cmd_site_init)
    adapt = site_p.add_parser(
        "adapt",
        help="adapt a global model to the site with its annotated cases: AdaBN, then fine-tuning with early stopping",
        description="Re-estimates the batch-norm statistics on the site's images (adapt.norm_stats), then fine-tunes "
        "the segmenter (and the retriever with adapt.tune_retriever) on the site's annotated cases: its support "
        "cases (support_cases in the site YAML), else its training split. adapt.val_fraction of those cases are held "
        "out (a site with fewer than adapt.min_cases cases, default 2, is not fine-tuned) and scored after each "
        "epoch as inference predicts; training stops after adapt.patience epochs without improvement and the best "
        "weights are kept, the unadapted start (epoch 0) included. Writes a checkpoint that jras eval --checkpoint "
        "and jras predict --checkpoint read, with the adaptation's record (epochs run, best epoch, validation Dice before and after) in its "
        "'adaptation' entry. Fine-tuning options: --set adapt.epochs=, adapt.patience=, adapt.lr=, "
        "adapt.val_fraction=, adapt.tune_retriever=.",
    )
    adapt.add_argument("--checkpoint", required=True, help="the global model (a federation's or jras train's checkpoint)")
    adapt.add_argument("--site", required=True, metavar="YAML", help="site config")
    adapt.add_argument("--out", metavar="SITE_MODEL.pt", help="where the site model is written (default: the site "
                       "YAML's adapted_model, else <cache_dir or the YAML's folder>/<name>-adapted.pt)")
    adapt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a method config value of the checkpoint's, e.g. --set adapt.lr=5e-5 (repeatable)")
    adapt.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_args(adapt)
    adapt.set_defaults(func=cmd_site_adapt)

    demo = sub.add_parser(
        "demo",
        help="a small simulated federation of the four synthetic vendors (Flower Simulation Engine)",
        description="Runs the ServerApp and four ClientApps (synthetic vendors A-D) through Flower's "
        "Simulation Engine with a managed local SuperLink, streams Flower's log, then prints the "
        "per-site Dice table and where the checkpoint and TensorBoard logs are. "
        "Centralised training is `jras train`.",
    )
    demo.add_argument("--rounds", type=int, default=5, metavar="N", help="federated rounds (default 5)")
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="run folder (default runs/demo; replaced)")
    demo.add_argument("--local-epochs", type=int, default=3, metavar="N", help="local epochs per round (default 3)")
    demo.add_argument("--cases", type=int, default=8, help="synthetic cases per vendor (default 8)")
    demo.add_argument("--timeout", type=float, default=0, metavar="S", help="stop the run after S seconds (default: none)")
    demo.add_argument("--quiet", action="store_true", help="do not stream Flower's log")
    add_device_args(demo)
    demo.add_argument("--gpus-per-site", type=float, metavar="F",
                      help="share of a GPU each simulated site reserves (default: the sites share the machine's "
                      "GPUs evenly when there are any and --device is not cpu; 0: CPU only)")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    cost = bench.add_parser(
        "cost",
        help="cost benchmark: step times, bank refresh, top-K search, peak memory, transfer bytes",
        description="Measures training step time (J-RAS vs none, phase B), bank refresh vs a local epoch, "
        "FAISS vs brute-force top-K latency, a client's peak resident memory and the model's transfer "
        "bytes (fp32 vs fp16); prints one table per section and writes cost.csv and cost.md to --out.",
    )
    _add_cost_arguments(cost)
    cost.set_defaults(func=cmd_bench_cost)
    shift = bench.add_parser(
        "shift",
        help="vendor-shift benchmark: leave-one-vendor-out federations, methods side by side",
        description="For each held-out vendor, federates the other vendors' sites through Flower's Simulation "
        "Engine (one run per method and seed), evaluates the held-out site with a bank of a few of its own "
        "annotated cases, and writes results.csv, report.md, a bar chart and a guide gallery to --out. "
        "A re-run with the same --out skips the runs already in results.csv.",
    )
    _add_shift_arguments(shift)
    shift.set_defaults(func=cmd_bench_shift)
    real = bench.add_parser(
        "real",
        help="real-data benchmark: an ACDC federation evaluated on the ACDC test site and unseen vendors",
        description="Federates the five ACDC hospital sites (sites/acdc-*.yaml, by pathology group or at random) "
        "through Flower's Simulation Engine, one run per method and seed, then evaluates the final model at every "
        "held-out site (ACDC test, LGE, M&Ms B and C), each with a bank of its own annotated support patients "
        "(AdaBN and fine-tuning where the method says), and the training sites' validation. Writes results.csv, "
        "cases.csv (per-volume Dice of small sites), report.md (tables, targets met or missed) and guide galleries "
        "to --out. A re-run with the same --out skips the runs already in results.csv. The data is read in place "
        "from shared/data beside the project folder.",
    )
    _add_real_arguments(real)
    real.set_defaults(func=cmd_bench_real)
    rounds = bench.add_parser(
        "rounds",
        help="round time through Flower: evaluation in the train exchange vs an evaluation phase",
        description="Runs one federation of the synthetic vendors (64 px and one local epoch by default; --size "
        "and --local-epochs for rounds of realistic work) with run config evaluate-in-train true and false, in "
        "turn, through Flower's Simulation Engine and/or a real SuperLink and SuperNodes on this machine; prints "
        "the round times (and, in simulation, Flower's overhead) and writes rounds.csv and rounds.md to --out.",
    )
    _add_rounds_arguments(rounds)
    rounds.set_defaults(func=cmd_bench_rounds)
    ef = bench.add_parser(
        "ef",
        help="ejection fraction from predicted masks against the ground truth, at sites' evaluated cases",
        description="Predicts the volumes `jras eval` evaluates at each site as `jras predict` does (the site's "
        "bank, labels on each volume's own grid), measures predicted and ground-truth masks, and reports per ED/ES "
        "pair the predicted and true LV and RV ejection fraction (and LV EDV, ESV) with the absolute errors, and "
        "their mean per site. Writes ef.csv and ef.md to --out.",
    )
    _add_ef_arguments(ef)
    ef.set_defaults(func=cmd_bench_ef)

    pki = sub.add_parser("pki", help="keys and certificates of a TLS + node-authenticated deployment")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True)
    ca = pki_sub.add_parser("ca", help="coordinator: create the federation's certificate authority (ca.key, ca.crt)")
    ca.add_argument("--out", required=True, metavar="DIR", help="output folder")
    ca.add_argument("--name", default="J-RAS federation CA", help="CA common name")
    ca.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    ca.set_defaults(func=cmd_pki_ca)
    sc = pki_sub.add_parser("server-cert", help="coordinator: the SuperLink's key and certificate signed by the CA "
                            "(server.key, server.pem)")
    sc.add_argument("--ca", required=True, metavar="DIR", help="folder with ca.key and ca.crt")
    sc.add_argument("--out", required=True, metavar="DIR", help="output folder")
    sc.add_argument("--host", action="append", metavar="NAME_OR_IP",
                    help="DNS name or IP address sites dial (repeatable; default localhost and 127.0.0.1)")
    sc.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    sc.set_defaults(func=cmd_pki_server_cert)
    nk = pki_sub.add_parser("node-key", help="site: the SuperNode's authentication key pair (OpenSSH ECDSA P-384)")
    nk.add_argument("--out", required=True, metavar="PATH", help="private key path; the public key is PATH.pub")
    nk.add_argument("--comment", default="", help="comment appended to the public key")
    nk.set_defaults(func=cmd_pki_node_key)

    deploy = sub.add_parser("deploy", help="coordinator and site services of a deployment")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    px = deploy_sub.add_parser(
        "proxy-config", help="coordinator: the nginx configuration of the public TLS listener, which forwards "
        "only the Fleet API to the loopback SuperLink",
        description="Write the nginx configuration of the coordinator's public listener: TLS with the "
        "coordinator's certificate, POST /v1/fleet/... forwarded (TLS again) to the SuperLink on loopback, "
        "every other path (the Control API of `flwr`, the Runtime API) refused with 403.",
    )
    add_coordinator_arguments(px)
    px.add_argument("--listen", default="0.0.0.0:8000", metavar="HOST:PORT",
                    help="public address the sites dial (default 0.0.0.0:8000)")
    px.add_argument("--state-dir", default=PROXY_STATE_DIR, metavar="DIR",
                    help=f"nginx's folder: pid file, access log, temporary files (default {PROXY_STATE_DIR})")
    px.add_argument("--max-body-mib", type=int, default=64, help="largest request body in MiB (default 64)")
    px.add_argument("--out", required=True, metavar="FILE", help="the nginx configuration to write")
    px.add_argument("--no-check", action="store_true", help="do not run `nginx -t` on the result")
    px.set_defaults(func=cmd_deploy_proxy_config)
    sd = deploy_sub.add_parser("systemd", help="systemd units: the coordinator's SuperLink and proxy, or a site's "
                               "SuperNode, with restart policies").add_subparsers(dest="role", required=True)
    default_bin = str(Path(sys.executable).parent)
    co = sd.add_parser("coordinator", help="jras-superlink.service (loopback, TLS, node authentication, state "
                       "in a database) and jras-proxy.service (nginx)")
    add_coordinator_arguments(co)
    co.add_argument("--proxy-conf", default="/etc/jras/nginx.conf", metavar="FILE",
                    help="the proxy's configuration from `jras deploy proxy-config` (default /etc/jras/nginx.conf)")
    co.add_argument("--proxy-state-dir", default=PROXY_STATE_DIR, metavar="DIR",
                    help=f"its --state-dir (default {PROXY_STATE_DIR})")
    co.add_argument("--nginx", metavar="PATH", help="the nginx executable (default: found on PATH)")
    co.add_argument("--state-dir", default="/var/lib/jras", metavar="DIR",
                    help="the SuperLink's folder: its database and Flower's home (default /var/lib/jras)")
    co.add_argument("--user", default="jras", help="the SuperLink's user (default jras)")
    st = sd.add_parser("site", help="jras-supernode.service: the SuperNode as an unprivileged user, restarted "
                       "until it gets in after a crash")
    st.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's public address")
    st.add_argument("--ca-cert", required=True, metavar="FILE", help="the federation's ca.crt")
    st.add_argument("--key", required=True, metavar="FILE", help="the SuperNode's private key (jras pki node-key)")
    st.add_argument("--site", required=True, metavar="YAML", help="the site YAML")
    st.add_argument("--writable", action="append", default=[], metavar="DIR",
                    help="a folder the SuperNode may write, e.g. the site's cache_dir (repeatable)")
    st.add_argument("--allow-ip", action="append", metavar="ADDRESS",
                    help="restrict the SuperNode's network to these addresses (the coordinator's) and loopback "
                    "(repeatable; default: unrestricted)")
    st.add_argument("--state-dir", default="/var/lib/jras-site", metavar="DIR",
                    help="the SuperNode's folder: Flower's home with the installed apps (default /var/lib/jras-site)")
    st.add_argument("--user", default="jras-site", help="the SuperNode's user (default jras-site)")
    for p in (co, st):
        p.add_argument("--bin-dir", default=default_bin, metavar="DIR",
                       help=f"the environment's bin folder with flower-superlink/-supernode (default {default_bin})")
        p.add_argument("--out", required=True, metavar="DIR", help="folder for the unit files")
        p.set_defaults(func=cmd_deploy_systemd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(raw)
    if getattr(args, "bench_command", None):
        # the benchmark's own arguments, for the command line its report prints to reproduce it
        args.argv = raw[raw.index("bench") + 2:]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        from jras_core.data.volume import DataError

        if not isinstance(exc, (ConfigError, DataError)):
            raise
        print(f"jras: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
