"""Training: the RL loop and what it needs around it.

trainer.py is the loop (read it top to bottom); batch.py the row batch the loss consumes;
rewards.py turns task scores into advantages as the config asks; planning.py lays out the update
(which rows, how many passes, what weight); reference.py is the KL reference policy; lowered_weights.py casts frozen weights
to the update's lower precision once; metrics.py the
per-step metrics; checkpoints.py and run_dir.py what a run writes; distributed.py and interrupts.py
the processes and Ctrl-C.
"""
