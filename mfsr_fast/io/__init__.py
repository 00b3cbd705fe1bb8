"""Files: images read and written without losing depth, alpha or metadata (``images``), and folders that prove they
are whole (``integrity``: manifests, checkpoint lookup, umask-respecting permissions).

The lowest room of ``mfsr_fast``: it imports nothing else of the package (numpy, Pillow and pypng only).
"""
