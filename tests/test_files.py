"""Tests of jras_core.files: paths in messages that leave the machine."""

from __future__ import annotations

import pytest

from jras_core.files import redact_paths


@pytest.mark.parametrize(
    "text,expected",
    [
        ("/srv/site/data/c1_gt.nii.gz: mask labels [7] outside 0..3", "data/c1_gt.nii.gz: mask labels [7] outside 0..3"),
        ("site m: /data/acdc/p1.nii.gz: truncated", "site m: .../p1.nii.gz: truncated"),
        ("cannot decrypt bank /srv/site/bank/bank.enc: wrong key", "cannot decrypt bank bank/bank.enc: wrong key"),
        ("[Errno 17] File exists: '/srv/site/cache'", "[Errno 17] File exists: 'cache'"),
        ("folder /srv/site does not exist", "folder . does not exist"),
        ("see https://example.org/a/b, ./rel/p, e.g. 1/2 and ~/x", "see https://example.org/a/b, ./rel/p, e.g. 1/2 and ~/x"),
        ("(/etc/passwd)", "(.../passwd)"),
    ],
)
def test_redact_paths_keeps_site_relative_names_only(text, expected):
    assert redact_paths(text, "/srv/site") == expected


def test_redact_paths_handles_a_root_with_spaces_and_no_root():
    assert redact_paths("/home/A B/site/x.nii.gz: bad", "/home/A B/site") == "x.nii.gz: bad"
    assert redact_paths("/home/a/site/x.nii.gz: bad") == ".../x.nii.gz: bad"
