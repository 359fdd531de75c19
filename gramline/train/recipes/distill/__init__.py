"""The distillation recipe: several students from one frozen teacher."""
