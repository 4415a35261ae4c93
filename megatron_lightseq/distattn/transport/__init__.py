"""Between ranks: the exchange (process group or virtual), deadlines and failures, the agreement, the counters."""
