# Packed documents from Megatron's own data pipeline (an indexed corpus from tools/preprocess_data.py
# --append-eod, DATA_PATH): each document attends only to itself; lightseq balances them over the CP
# group (--lightseq-layout auto) and never pads a document. README, "Documents from Megatron's own
# data pipeline".
ARGS+=(
  --reset-attention-mask           # documents after each EOD token (the plugin reads them from the batch)
  --no-create-attention-mask-in-dataloader   # the dense [s, s] mask would be dropped anyway: at 128K, 16 GiB
  --eod-mask-loss                  # EOD tokens carry no loss
  --calculate-per-token-loss       # CP ranks hold uneven numbers of unmasked tokens
)
