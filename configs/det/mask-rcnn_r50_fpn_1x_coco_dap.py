# Mask R-CNN R-50 FPN 1x (paper Table 8): mmdet's stock config, backbone initialised from a DaP export.
# The checkpoint is set per run by `tools/transfer_coco.sh`; with mmdet's own tools/train.py:
# --cfg-options model.backbone.init_cfg.checkpoint=EXPORT/backbone.pth
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='EXPORT_DIR/backbone.pth')))
