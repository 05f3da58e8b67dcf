"""Learning: the StreamingLearner, the parts its step is built from, and the baselines."""
