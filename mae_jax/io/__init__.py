"""What a run leaves on disk and on screen.

    checkpoint.py   orbax checkpoints: save, resume, params-only files, `load_params`
    metrics_log.py  the progress line, TensorBoard and metrics.jsonl
    visualize.py    the paper's reconstruction figure
"""
