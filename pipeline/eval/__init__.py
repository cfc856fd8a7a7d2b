"""Evaluation of trained models: CLIP score and FVD under a recorded protocol (`pomvid eval`).

    config.py       EvalConfig: what to evaluate and how
    protocol.py     EvalProtocol: the fields that make two results comparable, and its short id
    clip_score.py   ClipScorer (open_clip image-text similarity), the validation hook
    fvd.py          the Kinetics-400 I3D network, feature sums, the Fréchet distance
    real.py         real clips, their fingerprint, the real-statistics cache files
    realstats.py    the real side of FVD for a protocol: cached or computed across ranks
    run.py          run_eval: generate each rank's share, score, reduce, eval.json
    log.py          results into the training run in MLflow, one set of names per protocol
    registry.py     `pomvid export --register`: a model version in MLflow's registry
    entry.py        the command line shared by `pomvid eval` and jobs/eval.py

docs/eval.md explains the protocol and the choices.
"""
