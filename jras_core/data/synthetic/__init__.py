"""Deterministic synthetic multi-vendor cardiac short-axis cine MRI.

The project's embedded default dataset. Every case is a stack of short-axis
slices from the ventricular base to the apex, at end-diastole (ED) and
end-systole (ES), with labels in the M&Ms convention (0 background, 1 LV blood
pool, 2 LV myocardium, 3 RV blood pool).

Modules:

* :mod:`~jras_core.data.synthetic.vendors`: the vendor schema
  (:class:`VendorSpec`), its validation and YAML loading, and the built-in
  vendors ``A``-``D``;
* :mod:`~jras_core.data.synthetic.anatomy`: the per-case heart and thorax
  anatomy, shared by all vendors;
* :mod:`~jras_core.data.synthetic.render`: drawing one case-phase as an image
  and label mask in a vendor's appearance;
* :mod:`~jras_core.data.synthetic.generator`: :func:`generate_volumes`, cases of
  one vendor as :class:`~jras_core.data.volume.Volume` objects;
* :mod:`~jras_core.data.synthetic.writer`: :func:`write_dataset`, NIfTI files
  plus a manifest CSV.
"""

from jras_core.data.synthetic.generator import (
    DEFAULT_CASE_PREFIX,
    LABELS,
    PHASES,
    generate_volumes,
)
from jras_core.data.synthetic.vendors import BUILTIN_VENDORS, VendorSpec, get_vendor, load_vendors
from jras_core.data.synthetic.writer import MANIFEST_HEADER, write_dataset

__all__ = [
    "BUILTIN_VENDORS",
    "DEFAULT_CASE_PREFIX",
    "LABELS",
    "MANIFEST_HEADER",
    "PHASES",
    "VendorSpec",
    "generate_volumes",
    "get_vendor",
    "load_vendors",
    "write_dataset",
]
