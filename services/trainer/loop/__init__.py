"""The training loops, each readable top to bottom: supervised fine-tuning (`sft`, where the loss
is computed) and preference tuning with trl's losses (`preference`); the checkpoints they write
and resume from (`checkpoints`), the loss curve they leave (`plots`), and a full fine-tune
sharded over several processes (`sharding`)."""
