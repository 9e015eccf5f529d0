"""Retrieval: the private FAISS bank of a site and batched guide operations."""

from jras_core.retrieval.bank import RetrievalBank
from jras_core.retrieval.store import BankStore

__all__ = ["BankStore", "RetrievalBank"]
