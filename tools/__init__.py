"""Tools that go with fabric: benchmarks, demo network, network lab scripts. Not part of the package."""
