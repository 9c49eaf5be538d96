"""The neutral layer that router/ and ranks/ both build on, importing neither: requests and their
results, block hashes, the tokenizer, the timing model, the job's layout, and the wire between
ranks (typed control messages, the prefix-cache window)."""
