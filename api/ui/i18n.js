// Labels in Chinese (default) and English. t(key) looks the key up in the current language;
// elements with data-i18n="key" are relabelled by applyLabels() when the language changes.
const LABELS = {
  zh: {
    title: '水表管理平台', login: '登录', logout: '退出', username: '用户名', password: '密码',
    otp: '动态口令（可选）', login_failed: '用户名、密码或口令错误', too_many: '失败次数过多，请稍后再试',
    fleet: '设备总览', alarms: '告警', meter: '水表', dma: '分区计量', hydrants: '消火栓',
    commands: '指令', bills: '账单批次', lang: 'English',
    meters_total: '水表总数', gateways_online: '网关在线', gateways_offline: '网关离线',
    open_alarms: '未关闭告警', by_status: '按状态', by_protocol: '按协议', comm_health: '通信状况',
    last_seen: '最近通信', signal: '信号质量', gateways: '网关', online: '在线', offline: '离线',
    unknown: '未知', spool_depth: '缓存深度', uplink_lag: '上行延迟(秒)', firmware: '固件',
    meters: '水表数', health_at: '健康上报',
    ok: '正常', late: '延迟', silent: '失联', never: '从未通信', good: '良好', fair: '一般', poor: '差',
    lt_1h: '<1小时', '1h_6h': '1–6小时', '6h_24h': '6–24小时', '1d_3d': '1–3天', gt_3d: '>3天',
    active: '运行', installed: '已安装', faulty: '故障', in_stock: '在库', replaced: '已更换', retired: '已报废',
    state: '状态', severity: '级别', kind: '类型', raised_at: '发生时间', occurrences: '次数',
    acknowledge: '确认', close: '关闭', all: '全部', open: '未处理', acknowledged: '已确认',
    closed: '已关闭', critical: '严重', warning: '警告', info: '提示', filter: '筛选',
    meter_id: '表号/设备号', show: '查看', hourly: '按小时', daily: '按天',
    consumption: '用水量 (m³)', register: '表底读数 (m³)', estimated: '估算', rejected: '拒收',
    validated: '有效', timeline: '事件与指令', registry: '档案资料', no_data: '无数据',
    inflow: '供水量', metered: '计量用水', billed_est: '估算计费', loss_share: '漏损率',
    outlet: '出水口', pressure: '压力 (bar)', permits: '取水许可', unlock: '开锁', lock: '上锁',
    plan: '消火栓分布图', locked_state: '关闭', unlocked_state: '开启', needs_otp: '需要动态口令登录',
    command: '指令', device: '设备', action: '动作', issued_by: '发起人', issued_at: '发起时间',
    updated_at: '更新时间', reason: '原因', run: '批次', book: '抄表册', period: '账期',
    progress: '进度', created: '新账单', adjusted: '调整', unchanged: '未变', skipped: '跳过',
    started_at: '开始', finished_at: '结束', live: '实时', disconnected: '未连接',
    forbidden: '无权限', done: '完成', failed: '失败', role: '角色', customer_meters: '用户水表',
    alarm: '告警', sent: '已发送', queued: '排队', delivered: '已送达', confirmed: '已确认执行',
    expired: '已过期', cancelled: '已取消', permit_active: '生效中',
  },
  en: {
    title: 'Water meter platform', login: 'Log in', logout: 'Log out', username: 'Username',
    password: 'Password', otp: 'One-time code (optional)', login_failed: 'Wrong username, password or code',
    too_many: 'Too many failed attempts; try again later',
    fleet: 'Fleet', alarms: 'Alarms', meter: 'Meter', dma: 'DMA balance', hydrants: 'Hydrants',
    commands: 'Commands', bills: 'Bill runs', lang: '中文',
    meters_total: 'Meters', gateways_online: 'Gateways online', gateways_offline: 'Gateways offline',
    open_alarms: 'Open alarms', by_status: 'By status', by_protocol: 'By protocol',
    comm_health: 'Communication', last_seen: 'Last seen', signal: 'Signal quality', gateways: 'Gateways',
    online: 'online', offline: 'offline', unknown: 'unknown', spool_depth: 'Spool depth',
    uplink_lag: 'Uplink lag (s)', firmware: 'Firmware', meters: 'Meters', health_at: 'Health report',
    ok: 'ok', late: 'late', silent: 'silent', never: 'never heard', good: 'good', fair: 'fair', poor: 'poor',
    lt_1h: '<1 h', '1h_6h': '1–6 h', '6h_24h': '6–24 h', '1d_3d': '1–3 d', gt_3d: '>3 d',
    active: 'active', installed: 'installed', faulty: 'faulty', in_stock: 'in stock', replaced: 'replaced',
    retired: 'retired', state: 'State', severity: 'Severity', kind: 'Kind', raised_at: 'Raised',
    occurrences: 'Count', acknowledge: 'Acknowledge', close: 'Close', all: 'all', open: 'open',
    acknowledged: 'acknowledged', closed: 'closed', critical: 'critical', warning: 'warning', info: 'info',
    filter: 'Filter', meter_id: 'Meter no. / id', show: 'Show', hourly: 'Hourly', daily: 'Daily',
    consumption: 'Consumption (m³)', register: 'Register (m³)', estimated: 'estimated', rejected: 'rejected',
    validated: 'valid', timeline: 'Events and commands', registry: 'Registry data', no_data: 'No data',
    inflow: 'Inflow', metered: 'Metered', billed_est: 'Estimated (billed)', loss_share: 'Loss share',
    outlet: 'Outlet', pressure: 'Pressure (bar)', permits: 'Permits', unlock: 'Unlock', lock: 'Lock',
    plan: 'Hydrant plan', locked_state: 'closed', unlocked_state: 'open', needs_otp: 'needs a one-time-code login',
    command: 'Command', device: 'Device', action: 'Action', issued_by: 'Issued by', issued_at: 'Issued',
    updated_at: 'Updated', reason: 'Reason', run: 'Run', book: 'Book', period: 'Period', progress: 'Progress',
    created: 'new', adjusted: 'adjusted', unchanged: 'unchanged', skipped: 'skipped', started_at: 'Started',
    finished_at: 'Finished', live: 'live', disconnected: 'offline', forbidden: 'not allowed for your role',
    done: 'done', failed: 'failed', role: 'Role', customer_meters: 'customer meters', alarm: 'Alarm',
    sent: 'sent', queued: 'queued', delivered: 'delivered', confirmed: 'confirmed', expired: 'expired',
    cancelled: 'cancelled', permit_active: 'in force',
  },
};

let lang = localStorage.getItem('wm.lang') || 'zh';

/** The label of `key` in the current language (the key itself when there is none). */
export function t(key) {
  const v = LABELS[lang][key];
  return v === undefined ? String(key) : v;
}

/** The current language. */
export function currentLang() { return lang; }

/** Switches the language and relabels the static elements. */
export function setLang(l) {
  lang = l === 'en' ? 'en' : 'zh';
  localStorage.setItem('wm.lang', lang);
  document.documentElement.lang = lang === 'zh' ? 'zh-CN' : 'en';
  applyLabels();
}

/** Relabels every element with data-i18n. */
export function applyLabels(root = document) {
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll('[data-i18n-ph]')) el.placeholder = t(el.dataset.i18nPh);
  document.title = t('title');
}
