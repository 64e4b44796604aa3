# SimpleBaseline 256x192 with any timm CNN through DaPTimmBackbone (last feature level, stride 32, frozen BN).
# `tools/transfer_coco.sh` sets model_name, checkpoint and the head's in_channels from the export's meta.json;
# the values below are DenseNet-121's.
_base_ = 'mmpose::body_2d_keypoint/topdown_heatmap/coco/td-hm_res50_8xb64-210e_coco-256x192.py'

custom_imports = dict(imports=['downstream.timm_backbone'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type='DaPTimmBackbone',
        model_name='densenet121',
        out_indices=(4, ),
        checkpoint='EXPORT_DIR/backbone.pth',
        frozen_bn=True),
    head=dict(in_channels=1024))
val_dataloader = dict(dataset=dict(bbox_file=None))
test_dataloader = val_dataloader
