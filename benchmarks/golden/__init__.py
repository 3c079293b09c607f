"""Golden values from MocoSFL's own code: each module here writes one fixture file of tests/fixtures/mocosfl/.

    python -m benchmarks.golden --peer_dir ~/src/MocoSFL            # every part
    python -m benchmarks.golden --peer_dir ~/src/MocoSFL moco_step  # one part

Every part runs in a process of its own that imports MocoSFL from --peer_dir (`peer.import_mocosfl`): MocoSFL's
packages share their names with this project's (functions, models, configs), so no module of this project is
imported there. A part feeds MocoSFL fixed inputs (seeded tensors, fixed weights) and stores its inputs and
outputs; the tests feed this project the same inputs and compare. Nothing of MocoSFL's code is copied here.
"""
