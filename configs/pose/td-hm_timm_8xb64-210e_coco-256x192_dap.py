# SimpleBaseline 256x192 with any timm CNN through DaPTimmBackbone (configs/_base_/dap_timm_backbone.py; last
# feature level, stride 32); the head's in_channels below are DenseNet-121's, set per run by
# `tools/transfer_coco.sh`.
_base_ = [
    'mmpose::body_2d_keypoint/topdown_heatmap/coco/td-hm_res50_8xb64-210e_coco-256x192.py',
    '../_base_/dap_timm_backbone.py'
]

model = dict(backbone={{_base_.dap_timm_backbone_last}}, head=dict(in_channels=1024))
val_dataloader = dict(dataset=dict(bbox_file=None))
test_dataloader = val_dataloader
