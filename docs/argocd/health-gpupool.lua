-- Argo CD health check for gpuyard.io/GPUPool (key resource.customizations.health.gpuyard.io_GPUPool).
-- Healthy when Ready=True for the current generation. Every Ready=False reason of a pool
-- (no matching nodes, none ready, no allocatable GPUs) needs a person, so it is Degraded;
-- an Accepted=False condition, should a pool ever get one, is Degraded too.
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

local accepted = condition(status, "Accepted")
if accepted ~= nil and accepted.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(accepted)
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
if ready.status == "True" then
  hs.status = "Healthy"
elseif ready.status == "False" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = describe(ready)
return hs
