# SimpleBaseline R-50 256x192 (paper Table 9): mmpose's stock config, backbone initialised from a DaP export.
# The checkpoint is set per run by `tools/transfer_coco.sh`; with mmpose's own tools/train.py:
# --cfg-options model.backbone.init_cfg.checkpoint=EXPORT/backbone.pth
# Evaluation uses ground-truth person boxes unless a detection file is given (--person-dets FILE,
# e.g. COCO_val2017_detections_AP_H_56_person.json as in the paper).
_base_ = 'mmpose::body_2d_keypoint/topdown_heatmap/coco/td-hm_res50_8xb64-210e_coco-256x192.py'

model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='EXPORT_DIR/backbone.pth')))
val_dataloader = dict(dataset=dict(bbox_file=None))
test_dataloader = val_dataloader
