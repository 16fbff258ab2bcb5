"""Explanations of predictions by occlusion: hide part of an input, see how much the predicted
class's probability drops. Each module turns one kind of input into its perturbed copies (rows the
model's batcher computes together) and their scores back into an attribution; `png` draws them."""
