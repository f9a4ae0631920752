"""The peernix benchmark suite: ``python -m bench [--quick] [--out DIR]`` (see bench/README.rst)."""
