-- Argo CD health check for gpuyard.io/GPUPool (key resource.customizations.health.gpuyard.io_GPUPool).
-- It reads what Flux's kstatus reads: status.observedGeneration against the spec's
-- generation, then the abnormal-true conditions gpuyard sets. A pool waiting for nodes (none
-- matches, none is ready, none reports GPUs yet) is Reconciling=True: Progressing, since
-- nodes may join, as a node group scaling from zero adds them. Ready=True is Healthy.
local hs = {}

local function condition(status, condition_type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == condition_type then
      return c
    end
  end
  return nil
end

local function describe(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

local generation = obj.metadata.generation
local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for gpuyard to observe the pool"
  return hs
end
if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for gpuyard to observe generation " .. generation
  return hs
end

local stalled = condition(status, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end
local reconciling = condition(status, "Reconciling")
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(reconciling)
  return hs
end

local ready = condition(status, "Ready")
if ready == nil or ready.reason == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if ready.observedGeneration ~= nil and generation ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition of generation " .. generation
  return hs
end
-- Ready=False or Unknown with neither Stalled nor Reconciling True is Progressing, as
-- kstatus reads it.
if ready.status == "True" then
  hs.status = "Healthy"
else
  hs.status = "Progressing"
end
hs.message = describe(ready)
return hs
