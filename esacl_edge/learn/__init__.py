"""Learning: the learner, the parts its step is built from, the buffer and its byte format, the memory plan."""
