"""Networks: ViT backbones by name (vit_backbones), LoRA (lora), the teacher's decoder (decoder) and
network (teacher_net), small students (students). Import the submodules directly; nothing heavy
is imported here."""
