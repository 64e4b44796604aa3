# Mask R-CNN R-101 FPN 1x: mmdet's stock config, backbone initialised from a DaP export (see the R-50 config).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r101_fpn_1x_coco.py'

model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='EXPORT_DIR/backbone.pth')))
