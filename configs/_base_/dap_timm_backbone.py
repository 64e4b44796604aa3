# DaPTimmBackbone: any timm CNN (DenseNet-121/169, MobileNet-V1, ...) as an mmdet/mmpose backbone, with timm
# features_only and frozen BatchNorm, weights from a DaP export. Shared by configs/{det,pose}/*_timm_*_dap.py.
# `tools/transfer_coco.sh` sets model_name, checkpoint and out_indices per run (and the neck's or head's
# in_channels from the export's meta.json); the values here are DenseNet-121's.
custom_imports = dict(imports=['downstream.timm_backbone'], allow_failed_imports=False)
# strides 4-32, for an FPN
dap_timm_backbone = dict(
    _delete_=True,
    type='DaPTimmBackbone',
    model_name='densenet121',
    out_indices=(1, 2, 3, 4),
    checkpoint='EXPORT_DIR/backbone.pth',
    frozen_bn=True)
# the last level (stride 32), for a pose head
dap_timm_backbone_last = dict(dap_timm_backbone, out_indices=(4, ))
