# FPN Faster R-CNN 1x with any timm CNN (DenseNet-121/169, MobileNet-V1, ...) through DaPTimmBackbone
# (timm features_only, strides 4-32, frozen BatchNorm). `tools/transfer_coco.sh` sets model_name, checkpoint
# and the FPN's in_channels from the export's meta.json; the values below are DenseNet-121's.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

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
