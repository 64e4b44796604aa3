# Drop-and-Pick for mmpretrain's ImageNet recipes (paper Sec. 4.3), shared by configs/mmpretrain/*_in1k.py.
# Each of those inherits mmpretrain's own config plus this file and switches the sampler and head to DaP's
# (mmengine refuses the same key in two bases, so those two overrides sit in each config).
# Overrides: --cfg-options dap.keep=0.5 dap.warmup=1 dap.reuse=[] ...
custom_imports = dict(imports=['dap_pretrain.mm'], allow_failed_imports=False)
custom_hooks = [dict(type='DaPHook')]
# Sec. 4.3.1: W=10 warm-up epochs on all data, then keep the hardest p=90% of the current subset every I=2
# epochs during the first alpha=10 epochs of each cycle; all data is picked back up at the LR decays
# (reuse=None: the MultiStepLR milestones, 30/60/90) -> 73.9% of full-data compute (the paper's "75%").
# select: 'hard' (DaP), 'random' (DaP's subset sizes, uniform choice), 'none' (all data);
# seed=None: the runner's randomness seed (the same on every rank).
dap = dict(warmup=10, interval=2, keep=0.9, active=10, reuse=None, select='hard', seed=None)
