"""Self-supervised pretraining on pooled nnU-Net datasets: MAE and MoCo v3 for timm ViTs (timm-format
foundation checkpoints for the teacher and the ViT-Tiny student) and for the nnU-Net CNN
(``-pretrained_weights`` files). See documentation/pretraining.md."""
