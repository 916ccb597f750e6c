"""Retrieval: encoders, metric-learning heads, score fusion, gallery search and the pair builder.

Submodules import their heavy dependencies (transformers, open_clip, faiss) only when used.
"""
