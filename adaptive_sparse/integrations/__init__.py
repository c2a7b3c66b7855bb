"""Adapters that put the selecting sampler into the training loops people already use.

    adaptive_sparse.integrations.lightning   # pip install adaptive-sparse[lightning]
    adaptive_sparse.integrations.hf          # pip install adaptive-sparse[hf]

Each framework module imports its framework at the top, so import it by name; this package
imports neither, and `import adaptive_sparse` loads neither (the library needs torch alone).
`common` holds what both adapters share and needs torch alone.
"""
