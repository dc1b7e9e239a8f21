"""The jobs behind `python -m mae_jax.main` (picked by `config.job`), with their recipes.

    pretrain.py        MAE pretraining
    pictures.py        its reconstruction figures of a fixed held-out batch
    linear_probe.py    linear probing (BatchNorm + linear head on the frozen encoder, LARS)
    finetune.py        end-to-end and partial fine-tuning
    segmentation.py    semantic-segmentation fine-tuning (mean IoU, pixel accuracy)
    downstream.py      the training and evaluation loop the two downstream jobs share
    classification.py  what they share inside it: frozen/trained params, losses, top-k eval,
                       the classifier built from a checkpoint
    recipes.py         the paper's recipes as configs (configs/*.py start from them)
    optim.py           warmup + cosine or poly schedules, AdamW with the reference's weight-decay rule
    layer_decay.py     layer-wise lr decay for fine-tuning
    parallel.py        `config.parallelism`: pmap, or jit over a device mesh (data, fsdp)
    host_memory.py     on the CPU: malloc keeps each step's scratch memory instead of faulting it in
"""
