# ResNet-18 on ImageNet-1k with DaP at the paper's "75%" setting (Table 7): mmpretrain's stock recipe (SGD lr 0.1,
# 8 GPUs x 32 images, LR / 10 at epochs 30/60/90) trained for the paper's 120 epochs, plus DaP.
_base_ = ['mmpretrain::resnet/resnet18_8xb32_in1k.py', './_base_/dap_in1k.py']

model = dict(head=dict(type='DaPClsHead'))  # LinearClsHead that records each sample's loss
train_dataloader = dict(sampler=dict(type='DaPMMSampler'))
train_cfg = dict(max_epochs=120)  # paper Sec. 4.1 (mmpretrain's recipe: 100)
