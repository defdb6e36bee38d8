"""selfmoa: Mixture-of-Agents, Self-MoA and Self-MoA-Seq (work in progress)."""
__version__ = "0.1.0.dev0"


def main(argv=None):
    return 0
