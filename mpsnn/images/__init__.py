"""MPSImage, MPSTemporaryImage, descriptors, allocators, batches and MPSState."""
