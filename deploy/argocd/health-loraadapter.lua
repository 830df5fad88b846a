-- Argo CD health check for loraplane.io/LoRAAdapter.
-- Install it under resource.customizations.health.loraplane.io_LoRAAdapter in argocd-cm (docs/deploy.md).
--   Healthy      phase Ready (the operator saw the current spec and workers serve it)
--   Progressing  no status yet, the operator has not seen the current generation, or phase Pending/Registered
--   Degraded     phase Degraded or Failed, or the served name is held by another adapter; message says why
local hs = {}
local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the loraplane operator to assign an ID"
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local function condition(type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function workers()
  local w = status.workers
  if w == nil then
    return ""
  end
  return " (ready on " .. tostring(w.ready or 0) .. "/" .. tostring(w.total or 0) .. " workers)"
end

local name = condition("NameAvailable")
if name ~= nil and name.status == "False" then
  hs.status = "Degraded"
  hs.message = name.message or status.message or "The served name is held by another adapter"
  return hs
end

local phase = status.phase
if phase == "Ready" then
  hs.status = "Healthy"
  hs.message = "Adapter ID " .. tostring(status.id) .. " is ready" .. workers()
elseif phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = status.message or ("Adapter is " .. phase)
elseif phase == nil or phase == "Pending" or phase == "Registered" then
  hs.status = "Progressing"
  hs.message = status.message or ("Adapter is " .. tostring(phase or "Pending"))
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
