"""fusedtrain benchmarks (installed as `fusedtrain.benchmarks`): `python -m fusedtrain bench`."""
