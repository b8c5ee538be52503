"""Throughput of original vs patched model, timed in one process. See --help."""

import argparse

from evit_patch.commands import benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=benchmark.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    benchmark.add_arguments(parser)
    benchmark.run(parser.parse_args())
