"""Apple's kernel classes, one file per op family, each forward class beside its gradient."""
