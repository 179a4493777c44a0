"""The worker's touches of pynetdicom internals, in one private package (see install())."""
