# FPN Faster R-CNN R-50 1x (paper Table 8, "FPN"): mmdet's stock config, backbone initialised from a DaP export.
# The checkpoint is set per run by `tools/transfer_coco.sh` (downstream.config.set_backbone);
# with mmdet's own tools/train.py: --cfg-options model.backbone.init_cfg.checkpoint=EXPORT/backbone.pth
# timm's resnet50 has torchvision's key layout and RGB ImageNet normalisation, as the stock config expects.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='EXPORT_DIR/backbone.pth')))
