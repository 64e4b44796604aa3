# SimpleBaseline R-101 256x192 (paper Table 9): mmpose's stock config, backbone from a DaP export
# (see the R-50 config for the checkpoint and person boxes).
_base_ = 'mmpose::body_2d_keypoint/topdown_heatmap/coco/td-hm_res101_8xb64-210e_coco-256x192.py'

model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='EXPORT_DIR/backbone.pth')))
val_dataloader = dict(dataset=dict(bbox_file=None))
test_dataloader = val_dataloader
