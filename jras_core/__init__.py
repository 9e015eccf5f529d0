"""J-RAS: joint retrieval-augmented segmentation, the method and its building blocks."""

from jras_core.blas import choose_openblas_core

choose_openblas_core()  # before any module loads FAISS and its OpenBLAS
