"""Run pytorch-metric-learning's own unit tests for the six classes fusedtrain.mining replaces, with
PML's classes swapped for ours (or, with --impl pml, unchanged, for the baseline).

Needs a checkout of PML's repository (its tests are not in the PyPI sdist) and PML installed:

    git clone https://github.com/KevinMusgrave/pytorch-metric-learning /tmp/pml
    PYTHONPATH=python python tests/run_pml_upstream.py /tmp/pml            # ours
    PYTHONPATH=python python tests/run_pml_upstream.py /tmp/pml --impl pml # PML itself

The checkout's tests import the *installed* PML (we import it first, from a directory without PML's
`src/`), so the checkout's version only matters for the test files. TEST_DEVICE defaults to cpu and
TEST_DTYPES to PML's default (float16,float32,float64). Prints one line per test and the pass count;
exits 0 when every test passed. CI mirrors these cases in tests/test_mining_pml_upstream.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import unittest

MODULES = ["tests.losses.test_multi_similarity_loss", "tests.losses.test_tcm_loss",
           "tests.losses.test_cross_batch_memory", "tests.miners.test_multi_similarity_miner",
           "tests.miners.test_batch_hard_miner", "tests.miners.test_pair_margin_miner"]
REPLACED = {"losses": ["MultiSimilarityLoss", "ThresholdConsistentMarginLoss", "CrossBatchMemory"],
            "miners": ["MultiSimilarityMiner", "PairMarginMiner", "BatchHardMiner"]}


def swap_in_fusedtrain() -> None:
    """Point PML's public names at fusedtrain's classes before the test modules import them."""
    import pytorch_metric_learning.losses as pml_losses
    import pytorch_metric_learning.miners as pml_miners

    import fusedtrain.mining as ours
    for module, names in ((pml_losses, REPLACED["losses"]), (pml_miners, REPLACED["miners"])):
        for name in names:
            setattr(module, name, getattr(ours, name))


def _flatten(suite):
    for item in suite:
        yield from (_flatten(item) if isinstance(item, unittest.TestSuite) else (item,))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", help="root of a pytorch-metric-learning checkout (holds tests/)")
    parser.add_argument("--impl", choices=["fusedtrain", "pml"], default="fusedtrain")
    parser.add_argument("-k", dest="only", default="", help="run only the tests whose id contains this")
    args = parser.parse_args(argv)
    os.environ.setdefault("TEST_DEVICE", "cpu")
    checkout = os.path.abspath(args.checkout)
    os.chdir(tempfile.mkdtemp())  # PML's tests/__init__ puts "src" on sys.path: keep the installed PML
    import pytorch_metric_learning  # noqa: F401  (the installed one, before the checkout is on sys.path)
    sys.path.insert(0, checkout)
    if args.impl == "fusedtrain":
        swap_in_fusedtrain()
    suite = unittest.TestSuite(t for t in _flatten(unittest.defaultTestLoader.loadTestsFromNames(MODULES))
                               if args.only in t.id())
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors)
    print(f"{args.impl}: {result.testsRun - failed} of {result.testsRun} passed "
          f"(PML {pytorch_metric_learning.__version__})")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
