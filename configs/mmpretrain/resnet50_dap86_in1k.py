# ResNet-50 on ImageNet-1k with DaP at the paper's "86%" setting (Table 7): the 75% setting with p=0.95.
_base_ = './resnet50_dap75_in1k.py'

dap = dict(keep=0.95)  # -> 86.0% of full-data compute
