-- Fencing for the checkpoints of stateful stages (features, scoring, fleet).
--
-- During a rebalance, the instance a partition was revoked from can still be writing a checkpoint
-- of it while its successor restores it; the successor would then start from a checkpoint that is
-- not the last one, or the two would write over each other, and state and offsets would stop
-- matching (records folded twice or not at all). So restoring a partition claims it: the claim
-- takes the partition's next epoch, and a checkpoint is written only by the holder of the
-- current epoch, checked under this row's lock in the checkpoint's own transaction.
CREATE TABLE partition_owners (
    consumer_group text NOT NULL,
    partition integer NOT NULL,
    -- Incremented by every claim.
    epoch bigint NOT NULL,
    -- Which instance holds it (host and process), for operators.
    owner text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer_group, partition)
);

COMMENT ON TABLE partition_owners IS
    'Which instance of a stateful stage holds each input partition; checkpoints are written only under the current epoch.';
