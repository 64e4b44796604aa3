# Mask R-CNN FPN 1x with any timm CNN through DaPTimmBackbone (see faster-rcnn_timm_fpn_1x_coco_dap.py).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['downstream.timm_backbone'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type='DaPTimmBackbone',
        model_name='densenet121',
        out_indices=(1, 2, 3, 4),
        checkpoint='EXPORT_DIR/backbone.pth',
        frozen_bn=True),
    neck=dict(in_channels=[256, 512, 1024, 1024]))
