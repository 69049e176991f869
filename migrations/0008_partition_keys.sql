-- State a partition owns as a whole (the feature stage's clock, the fleet stage's progress) was
-- checkpointed under one key per stage, and `stage_state`'s key is unique per consumer group: each
-- partition's checkpoint took the row over from the others, so a partition restored after
-- another had written it came back without its own. Such keys now name their partition
-- (`<name>/<partition>`); the row as last written names the partition whose state it holds.
UPDATE stage_state
SET key = key || '/' || partition
WHERE key IN (E'\x01clock', E'\x01progress');
