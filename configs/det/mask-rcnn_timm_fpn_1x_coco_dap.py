# Mask R-CNN FPN 1x with any timm CNN through DaPTimmBackbone (configs/_base_/dap_timm_backbone.py);
# the FPN's in_channels below are DenseNet-121's, set per run by `tools/transfer_coco.sh`.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', '../_base_/dap_timm_backbone.py']

model = dict(backbone={{_base_.dap_timm_backbone}}, neck=dict(in_channels=[256, 512, 1024, 1024]))
