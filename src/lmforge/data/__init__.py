"""The data stages: download a corpus, plan shards, tokenize, count, build the
dictionary, binarize and merge into fairseq's data-bin, on a pool of processes
(`lmforge preprocess`) or as KFP fan-out tasks."""
