# FPN Faster R-CNN R-101 1x: mmdet's stock config, backbone initialised from a DaP export (see the R-50 config).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r101_fpn_1x_coco.py'

model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='EXPORT_DIR/backbone.pth')))
