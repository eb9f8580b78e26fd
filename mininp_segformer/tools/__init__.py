"""The tools around the network: the command line, many images at once, the benchmark, pictures, metrics, FLOP
counts, the procedural scenes of the demo model, and the parity checks of the chapters."""
