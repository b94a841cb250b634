"""Evaluation: caption a split and score it with the coco-caption metrics (``evaluate``,
``metrics``; needs ``edgecap[eval]``: pycocoevalcap, and Java for METEOR and the PTB tokenizer)."""
